# RetinaNet with an H-MaiT-T backbone, 1x schedule on COCO: mmdet's Swin-T RetinaNet recipe with
# the backbone swapped, stages 1-3 feeding the FPN.
_base_ = ['mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', './_base_/models/hmait_t_backbone.py']

custom_imports = dict(imports=['hmait', 'hmait.mm.det'], allow_failed_imports=False)

pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _base_.hmait_backbone,
        # Only the stages the FPN reads: an unused stage-0 norm would leave parameters without
        # gradients, which DDP rejects.
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768], start_level=0, num_outs=5))

train_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = val_dataloader

# The transformer recipe (AdamW lr 1e-4, weight decay 0.05) rather than the base's SGD lr 0.01,
# which was tuned for ResNets.
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys=_base_.hmait_decay_exceptions))
