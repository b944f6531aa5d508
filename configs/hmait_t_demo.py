# The quick-start: a reduced H-MaiT-T (the real model class, fewer and narrower blocks) trained on
# the synthetic 10-class set from `tools/generate_demo_data.py imagenet data/demo_imagenet
# --train-per-class 200 --val-per-class 50`, with the ImageNet recipe's pieces, on 2 CPU cores in
# about 2.5 minutes (24 epochs of 2000 images, 1488 iterations; 82.8-91.2 % validation accuracy over
# seeds 0-4 on a 2-core AMD EPYC, against 10 % chance; see docs/training.md).
#
# Why this recipe: a transformer trained from scratch on these images first sits at chance level
# until it has seen some thousands of images (the shapes have random colours, so it must learn
# colour-free edge features first). With 1000 images, 24 epochs, colour jitter, label smoothing and
# drop path that took 8-9 of the 24 epochs, and the final accuracy depended on when the run left
# the plateau (seed- and CPU-dependent). Twice the images and lighter regularisation leave it within
# 2-3 epochs. Even so, with a 2-epoch warm-up some seeds sat at chance for 4-6 epochs more, at the
# full learning rate, and ended 6-10 points lower; a 5-epoch warm-up leaves the plateau by epoch 4.
_base_ = ['./hmait_t_imagenet.py']

data_root = 'data/demo_imagenet'
img_size = 64
max_epochs = 24
warmup_epochs = 5

model = dict(
    num_classes=10,
    model_kwargs=dict(drop_path_rate=0.0, embed_dims=32, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16),
                      masked_heads=(2, 4, 3, 0)),
    # Mixup/CutMix and label smoothing slow down learning more than a 2-minute run can afford.
    mixup=dict(prob=0.0),
    label_smoothing=0.0)

# 64-pixel images: keep most of the shape in the crop, and evaluate on the whole image.
train_dataloader = dict(
    # num_workers=0: the 64-pixel JPEGs decode in the training process faster than a worker process
    # starts and hands them over; both cores go to the model (cpu_threads below).
    batch_size=32, num_workers=0, persistent_workers=False, pin_memory=False,
    # RandAugment, random erasing and colour jitter off: the colours are random already, and each of
    # them lengthens the initial plateau of a small transformer trained from scratch.
    dataset=dict(data_root=data_root,
                 transform=dict(input_size=img_size, scale=(0.6, 1.0), color_jitter=0.0, auto_augment=None,
                                re_prob=0.0)))
val_dataloader = dict(
    batch_size=100, num_workers=0, persistent_workers=False, pin_memory=False,
    dataset=dict(data_root=data_root, transform=dict(input_size=img_size, crop_pct=1.0)))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, begin=0, end=warmup_epochs, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
auto_scale_lr = dict(enable=False)  # lr above is for this batch of 32

default_hooks = dict(logger=dict(interval=10), checkpoint=dict(max_keep_ckpts=2))
randomness = dict(seed=0)
# Both cores for the model's torch threads: the data loading above runs in the same process.
cpu_threads = 2
