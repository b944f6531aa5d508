# MaiT-XT (24 layers, LayerScale, masking Sch.2) on ImageNet-1k: paper Table 8 gives it MaiT-T's
# hyper-parameters (lr 0.001 x batch / 512, drop path 0, batch 1024), DeiT recipe otherwise.
#   tools/dist_train.sh configs/mait_xt_imagenet.py 8
_base_ = ['./mait_t_imagenet.py']

model = dict(model_name='mait_xtiny')
