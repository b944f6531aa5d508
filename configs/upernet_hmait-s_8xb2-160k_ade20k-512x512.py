# UperNet with an H-MaiT-S backbone on ADE20K: the H-MaiT-T recipe with Swin-S depths.
_base_ = './upernet_hmait-t_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/hmait_s_imagenet.pth'

model = dict(
    backbone=dict(
        depths=[2, 2, 18, 2],
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
