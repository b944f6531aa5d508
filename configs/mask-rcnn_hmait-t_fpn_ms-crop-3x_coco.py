# Mask R-CNN with an H-MaiT-T backbone, 3x schedule (36 epochs) with multi-scale and crop
# augmentation on COCO: mmdet's Swin-T 3x recipe with the backbone swapped.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'

custom_imports = dict(imports=['hmait', 'hmait.mm.det'], allow_failed_imports=False)

# ImageNet-1k H-MaiT-T weights (see docs/model_zoo.md); a missing file is an error naming it.
pretrained = 'checkpoints/hmait_t_imagenet.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='HMaiT',
        arch='tiny',  # Swin-T's shape with the paper's masked heads per stage (HMaiT's ARCH_SETTINGS)
        # Global heads over keys and values pooled to the 224-px grid of each stage (14x14, 7x7): the
        # paper's model at 224 px, a cost linear in the pixels beyond. global_attn='full' gives the
        # paper's heads over the whole stage (quadratic; see docs/model_zoo.md).
        global_attn='pooled',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

train_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
val_dataloader = dict(dataset=dict(type='CheckedCocoDataset'))
test_dataloader = val_dataloader

optim_wrapper = dict(
    paramwise_cfg=dict(
        _delete_=True,
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'soft_mask_logit': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
