# Cascade Mask R-CNN with an H-MaiT-T backbone, 3x multi-scale-crop schedule on COCO.
# Swin's cascade recipe (4conv1fc box heads with GIoU loss, DETR-style multi-scale crop, 36 epochs)
# ships in mmdet as its ConvNeXt-T cascade config; it is inherited and the backbone swapped.
_base_ = [
    'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py',
    './_base_/models/hmait_t_backbone.py'
]

# Replaces the base's mmpretrain import: H-MaiT needs only hmait.
custom_imports = dict(imports=['hmait', 'hmait.mm.det'], allow_failed_imports=False)

pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _base_.hmait_backbone,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

train_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = val_dataloader

# Swin's optimiser (AdamW lr 1e-4, weight decay 0.05, full precision) instead of the ConvNeXt
# layer-wise decay and mixed precision of the base.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys=_base_.hmait_decay_exceptions))
