"""Network building blocks for policies (no env or agent imports)."""
from distillery.policies.networks.encoders import (
    GROUP_ENCODERS, OBS_ENCODERS, MultiGroupObsEncoder, ObsEncoder, make_obs_encoder, mlp, register_group_encoder,
    register_obs_encoder,
)
from distillery.policies.networks.unet1d import ConditionalResidualBlock1D, ConditionalUnet1D, SinusoidalPosEmb

__all__ = [
    "GROUP_ENCODERS", "OBS_ENCODERS", "MultiGroupObsEncoder", "ObsEncoder", "make_obs_encoder", "mlp",
    "register_group_encoder", "register_obs_encoder", "ConditionalResidualBlock1D", "ConditionalUnet1D",
    "SinusoidalPosEmb",
]
