# UperNet with an H-MaiT-S backbone on ADE20K: the H-MaiT-T recipe with the 'small' preset (Swin-S depths).
_base_ = './upernet_hmait-t_8xb2-160k_ade20k-512x512.py'

pretrained = 'checkpoints/hmait_s_imagenet.pth'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
