# MaiT-XS (24 layers, LayerScale, masking Sch.2; paper Tables 5 and 7) on ImageNet-1k: paper Table 8
# lr 0.0005 x batch / 512 and a linear stochastic depth of 0.1, batch 1024, DeiT recipe otherwise.
#   tools/dist_train.sh configs/mait_xs_imagenet.py 8
_base_ = ['./mait_t_imagenet.py']

base_lr = 0.0005 * 1024 / 512
model = dict(model_name='mait_xsmall', model_kwargs=dict(drop_path_rate=0.1, drop_path_uniform=False))
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0, end={{_base_.warmup_epochs}},
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin={{_base_.warmup_epochs}},
         end={{_base_.max_epochs}}, convert_to_iter_based=True),
]
