# UperNet with an H-MaiT-T backbone on ADE20K, 512x512 crops, 160k iterations at 8 GPUs x 2 images:
# mmseg's Swin-T UperNet recipe (AdamW lr 6e-5, linear warm-up for 1500 iterations, then poly
# decay; stochastic depth 0.3) with the backbone swapped.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    './_base_/models/hmait_t_backbone.py'
]

# `hmait.mm.seg` registers CheckedADE20KDataset, which rejects missing images/label maps and label
# values outside the class range with an error naming the file.
custom_imports = dict(imports=['hmait', 'hmait.mm.seg'], allow_failed_imports=False)

# ImageNet-1k H-MaiT-T weights (see docs/model_zoo.md); a missing file is an error naming it.
pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _base_.hmait_backbone,
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

train_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
val_dataloader = dict(dataset=dict(type='CheckedADE20KDataset'))
test_dataloader = val_dataloader

# Inherited: AdamW lr 6e-5, weight decay 0.01, LinearLR warm-up 1500 iterations then PolyLR.
# No weight decay on norms, the position embedding and the soft-masking factors.
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys=_base_.hmait_decay_exceptions))
