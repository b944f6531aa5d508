# Mask R-CNN with an H-MaiT-T backbone, 1x schedule (12 epochs) on COCO: mmdet's Swin-T recipe
# with the backbone swapped. Everything else (heads, data, schedule, runtime) is inherited from mmdet.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', './_base_/models/hmait_t_backbone.py']

# `hmait` registers the HMaiT backbone; `hmait.mm.det` registers CheckedCocoDataset, which turns
# bad annotation files, missing images and unknown category ids into errors naming the file.
custom_imports = dict(imports=['hmait', 'hmait.mm.det'], allow_failed_imports=False)

# ImageNet-1k H-MaiT-T weights saved by tools/train.py (classification), relative to the working
# directory. A missing file stops training with an error naming this path.
pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _base_.hmait_backbone,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

train_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = val_dataloader

# AdamW lr 1e-4, weight decay 0.05 (inherited), none on norms, the position embedding and the
# soft-masking factors (per-head scalars, like Swin's relative position tables).
optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys=_base_.hmait_decay_exceptions))
