"""Write an adaptation run's intermediate policy weights (warm_start.pt or iter{k}/policy.pt) as an nnU-Net model
folder, to score what each part of the loop adds (e.g. the warm start alone vs the RL adapted model).

Usage: python results/camus220/export_stage_weights.py SOURCE_MODEL RUN/warm_start.pt OUT
"""
import sys

import torch

from rl_adapt.policies.nnunet import export_model_folder, load_model_folder

source = load_model_folder(sys.argv[1])
print(export_model_folder(torch.load(sys.argv[2], map_location="cpu"), source, sys.argv[3],
                          extra_meta={"from": sys.argv[2]}))
