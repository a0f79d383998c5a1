"""rl_adapt: RL domain adaptation for nnU-Net echocardiography segmentation."""
__version__ = "0.1.0"
