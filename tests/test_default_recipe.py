"""The default swap survives an outlier weight; the paper's tensor-wise variant keeps its name.

timm's trunc_normal_(std=.02) leaves entries at exactly +-2.0 (its bounds), about 0.1 per
ViT-B-sized tensor: one such entry in a (768, 3072) weight of std 0.02 sets a tensor-wise int8
scale 100x too coarse for every other weight.
"""

import copy

import torch
from torch import nn

import lowbit
from lowbit.nn import SwitchBackLinear


def outlier_layer():
    torch.manual_seed(0)
    layer = nn.Linear(3072, 768)
    nn.init.normal_(layer.weight, std=0.02)
    with torch.no_grad():
        layer.weight[5, 100] = 2.0
    return layer


def forward_db(layer, x):
    return lowbit.coverage(layer, x).layers[0].sqnr_db


def test_default_swap_keeps_30_db_on_an_outlier_weight():
    layer, x = outlier_layer(), torch.randn(256, 3072)
    default = lowbit.swap(copy.deepcopy(layer), filter_fn=lambda m, n: True)
    tensor_wise = lowbit.swap(copy.deepcopy(layer), "switchback", filter_fn=lambda m, n: True)
    assert isinstance(default, SwitchBackLinear) and default.config.weight_quant == "row"
    assert tensor_wise.config.weight_quant == "tensor"  # "switchback" is still the paper's variant
    default_db, tensor_db = forward_db(default, x), forward_db(tensor_wise, x)
    print(f"outlier layer: default (row-wise) {default_db:.1f} dB, tensor-wise {tensor_db:.1f} dB")
    assert default_db >= 30 and tensor_db < 20
