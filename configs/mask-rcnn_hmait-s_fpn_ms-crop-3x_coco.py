# Mask R-CNN with an H-MaiT-S backbone, 3x multi-scale-crop schedule on COCO: the H-MaiT-T 3x
# recipe with the 'small' preset (Swin-S depths) and stochastic depth 0.3.
_base_ = './mask-rcnn_hmait-t_fpn_ms-crop-3x_coco.py'

pretrained = 'checkpoints/hmait_s_imagenet.pth'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
