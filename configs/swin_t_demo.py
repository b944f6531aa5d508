# timm's Swin at the demo's reduced size (embed 32, depths (1, 1, 2, 1), heads (2, 4, 8, 16)) with the
# demo's recipe and data, for `make demo-compare`. 4 x 4 windows on the 16 x 16 token grid of 64-pixel
# images: 4 windows per side in stage 1, 2 in stage 2, one window covering the whole grid in stages 3
# and 4 (timm shrinks a window larger than the grid to the grid and drops the shift there).
_base_ = ['./hmait_t_demo.py']

model = dict(
    model_name='swin_tiny_patch4_window7_224',
    model_kwargs=dict(_delete_=True, drop_path_rate=0.0, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16),
                      img_size=64, window_size=4))
