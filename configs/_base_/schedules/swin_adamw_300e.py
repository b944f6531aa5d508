# Swin's ImageNet schedule: AdamW, lr 1e-3 at a total batch of 1024 (scaled linearly with the real
# batch by auto_scale_lr), weight decay 0.05 except on norms, biases and position embeddings,
# 20 linear warm-up epochs from lr / 1000, cosine decay to lr / 100, gradient clipping at 5.0.
max_epochs = 300
warmup_epochs = 20

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    # flat_decay_mult: every 1-D parameter (norm weights, biases, soft-mask logits), as Swin does.
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
                       custom_keys={'absolute_pos_embed': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         convert_to_iter_based=True),
]

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# lr above is for this total batch; tools/train.py scales it to GPUs x batch_size.
auto_scale_lr = dict(base_batch_size=1024, enable=True)
