# Runtime for classification training with mmengine's Runner (root registries).
default_scope = 'mmengine'
# hmait registers the models; hmait.engine the classifier, data set, sampler, metric, hooks and
# the atomic checkpoint backend.
custom_imports = dict(imports=['hmait', 'hmait.engine'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),  # loss, lr, time and ETA
    param_scheduler=dict(type='ParamSchedulerHook'),
    # local_atomic: checkpoints and last_checkpoint are renamed into place, never left half-written.
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='accuracy/top1', rule='greater',
                    backend_args=dict(backend='local_atomic')),
    sampler_seed=dict(type='DistSamplerSeedHook'))
# Reseeding of the training process's generators (Mixup, drop path) for an exact resume, and
# the count of skipped unreadable images in the log.
custom_hooks = [dict(type='IterSeedHook'), dict(type='UnreadableImagesHook')]

env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=True, window_size=50)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
