# MaiT-T (24 layers, LayerScale, masking Sch.2) on ImageNet-1k with the DeiT recipe and the paper's
# Table 8 hyper-parameters: batch 1024, lr 0.001 x batch / 512, drop path 0; 400 epochs for models
# deeper than 12 layers (paper section 5.1).
#   tools/dist_train.sh configs/mait_t_imagenet.py 8
# Paper Table 7's MaiT-T (79.3 %) matches Table 4's Sch.3 (soft masking) result; for that run set
# model_kwargs=dict(masked_heads='sch3', layer_scale=False).
_base_ = ['_base_/models/timm_classifier.py', '_base_/datasets/imagenet_224.py',
          '_base_/schedules/swin_adamw_300e.py', '_base_/cls_runtime.py']

max_epochs = 400
warmup_epochs = 5  # DeiT
base_lr = 0.001 * 1024 / 512  # paper Table 8, at the total batch of 1024

# Mixup 0.8 / CutMix 1.0 and label smoothing 0.1 from the base classifier are DeiT's too.
model = dict(model_name='mait_tiny', model_kwargs=dict(depth=24, layer_scale=True, masked_heads='sch2',
                                                       drop_path_rate=0.0))

# DeiT's AdamW: weight decay 0.05, none on 1-D parameters (norms, biases, soft-mask logits) nor on the
# tokens and position embedding (timm's no_weight_decay), no gradient clipping.
optim_wrapper = dict(
    optimizer=dict(lr=base_lr, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'pos_embed': dict(decay_mult=0.0), 'cls_token': dict(decay_mult=0.0),
                                    'dist_token': dict(decay_mult=0.0)}),
    clip_grad=None)

# DeiT's schedule: 5 linear warm-up epochs from 1e-6, cosine decay to 1e-5.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs)
auto_scale_lr = dict(base_batch_size=1024, enable=True)
