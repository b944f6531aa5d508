# An mmengine classifier around a timm model, with the recipe's Mixup 0.8 / CutMix 1.0 and label
# smoothing 0.1 (timm's Mixup and SoftTargetCrossEntropy). Configs set model.model_name and
# model.model_kwargs (drop_path_rate, ...).
model = dict(
    type='TimmImageClassifier',
    model_name='hmait_tiny',
    num_classes=1000,
    model_kwargs=dict(drop_path_rate=0.2),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1)
