# The H-MaiT-T backbone of the detection and segmentation configs, and the weight-decay exceptions of
# its parameters. A config lists this file after its mmdet or mmseg base and uses the two variables:
#
#   _base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', './_base_/models/hmait_t_backbone.py']
#   model = dict(backbone=dict(_base_.hmait_backbone, init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
#   optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, custom_keys=_base_.hmait_decay_exceptions))
#
# (Variables, not a `model` entry: mmengine refuses a key that two bases both define.)
hmait_backbone = dict(
    _delete_=True,  # replaces the base's Swin backbone as a whole
    type='HMaiT',
    arch='tiny',  # Swin-T's shape with the paper's masked heads per stage (HMaiT's ARCH_SETTINGS)
    # Global heads over keys and values pooled to the 224-px grid of each stage (14x14, 7x7): the
    # paper's model at 224 px, a cost linear in the pixels beyond. global_attn='full' gives the
    # paper's heads over the whole stage (quadratic; see docs/model_zoo.md).
    global_attn='pooled',
    drop_path_rate=0.2,
    out_indices=(0, 1, 2, 3))

# No weight decay on norms, the position embedding and the soft-masking factors (per-head scalars,
# like Swin's relative position tables).
hmait_decay_exceptions = {
    'absolute_pos_embed': dict(decay_mult=0.),
    'soft_mask_logit': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.)
}
