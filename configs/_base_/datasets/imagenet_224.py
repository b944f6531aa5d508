# ImageNet-1k in folder layout: data_root/train/<class>/*.JPEG, data_root/val/<class>/*.JPEG.
# Swin's augmentation through timm: RandomResizedCrop 224 (bicubic), flip, colour jitter 0.4,
# RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25; evaluation resizes to 256 and crops 224.
data_root = 'data/imagenet'
img_size = 224
mean = (0.485, 0.456, 0.406)
std = (0.229, 0.224, 0.225)

train_transform = dict(input_size=img_size, is_training=True, hflip=0.5, color_jitter=0.4,
                       auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                       re_prob=0.25, re_mode='pixel', re_count=1, mean=mean, std=std)
test_transform = dict(input_size=img_size, is_training=False, interpolation='bicubic', crop_pct=0.875,
                      mean=mean, std=std)

train_dataloader = dict(
    batch_size=128,  # per GPU: 8 GPUs x 128 = 1024, the recipe's total batch
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    drop_last=True,  # Mixup pairs samples within a batch, which must be even
    # SeededSampler: augmentation depends only on (seed, epoch, index), so --resume is exact.
    sampler=dict(type='SeededSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageFolderDataset', data_root=data_root, split='train', transform=train_transform,
                 on_corrupt='skip'))
val_dataloader = dict(
    batch_size=128,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageFolderDataset', data_root=data_root, split='val', transform=test_transform,
                 on_corrupt='skip'))
val_evaluator = dict(type='TopKAccuracy', topk=(1, 5))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
