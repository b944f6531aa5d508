# Mask R-CNN with an H-MaiT-T backbone, 3x schedule (36 epochs) with multi-scale and crop
# augmentation on COCO: mmdet's Swin-T 3x recipe with the backbone swapped.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', './_base_/models/hmait_t_backbone.py']

custom_imports = dict(imports=['hmait', 'hmait.mm.det'], allow_failed_imports=False)

# ImageNet-1k H-MaiT-T weights (see docs/model_zoo.md); a missing file is an error naming it.
pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _base_.hmait_backbone,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

train_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = val_dataloader

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys=_base_.hmait_decay_exceptions))
