# MaiT-S (24 layers, LayerScale, masking Sch.2; paper Tables 5 and 7) on ImageNet-1k: paper Table 8
# lr 0.0005 x batch / 512 and a constant stochastic depth of 0.1 in every layer (as CaiT),
# batch 1024, DeiT recipe otherwise.
#   tools/dist_train.sh configs/mait_s_imagenet.py 8
_base_ = ['./mait_xs_imagenet.py']

model = dict(model_name='mait_small', model_kwargs=dict(drop_path_rate=0.1, drop_path_uniform=True))
