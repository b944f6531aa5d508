# H-MaiT-S on ImageNet-1k with Swin-S's recipe (paper section 5.4): 300 epochs, 8 GPUs x 128.
#   tools/dist_train.sh configs/hmait_s_imagenet.py 8
_base_ = ['_base_/models/timm_classifier.py', '_base_/datasets/imagenet_224.py',
          '_base_/schedules/swin_adamw_300e.py', '_base_/cls_runtime.py']

model = dict(model_name='hmait_small', model_kwargs=dict(drop_path_rate=0.3))
