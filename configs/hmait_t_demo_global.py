# The demo's network and recipe with every head global (masked_heads=(0, 0, 0, 0)): what the masked
# heads of configs/hmait_t_demo.py buy on the same data and budget (`make demo-compare`).
_base_ = ['./hmait_t_demo.py']

model = dict(model_kwargs=dict(masked_heads=(0, 0, 0, 0)))
