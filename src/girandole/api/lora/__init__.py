"""LoRA addons: `/v1/accounts/{a}/deployedModels[/{id}]` (Fireworks' load/list/get/update/unload
of an adapter on a deployment), wired into the app by `install_lora`."""

from girandole.api.lora.route import install_lora

__all__ = ["install_lora"]
