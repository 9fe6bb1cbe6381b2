"""The registered methods the shared contract tests run over (tests/attribution/test_attr_contracts.py,
test_attr_template_and_messages.py, test_attr_controls_registry.py).

Every registered method is either in :data:`METHODS` (explained on the tiny CNN of conftest.py) or in
:data:`NOT_ON_A_CNN` with the reason; ``test_every_registered_method_is_under_the_contracts`` keeps it that way.
"""

from __future__ import annotations

METHODS = [
    "gradient", "gradient_x_input", "smoothgrad", "smoothgrad_squared", "vargrad", "integrated_gradients",
    "guided_backprop", "deconvnet", "gradcam", "hirescam", "guided_gradcam", "occlusion", "feature_ablation",
    "kernel_shap", "lime", "lrp", "excitation_backprop", "contrastive_excitation_backprop", "rise", "cgi",
    "edge", "random",
]
#: registered methods the CNN contracts cannot run, and why (their own files test them on the models they need).
NOT_ON_A_CNN = {
    "attention_rollout": "reads attention probabilities, which a CNN has none of (tests: test_attr_attention.py)",
    "gradient_rollout": "reads attention probabilities and their gradients (tests: test_attr_attention.py)",
}
#: controls ignore the model, so the contracts about the model (modes, parameters, hooks, targets) do not apply.
CONTROLS = ("edge", "random")
MODEL_METHODS = [m for m in METHODS if m not in CONTROLS]
#: methods whose work is split in blocks of at most ``batch_size`` rows per forward pass.
BLOCKED = ["smoothgrad", "smoothgrad_squared", "vargrad", "integrated_gradients", "occlusion", "feature_ablation",
           "kernel_shap", "lime", "rise", "cgi"]
#: methods that draw random noise per example position: a batch and a batch of one see different noise.
NOISY = ("smoothgrad", "smoothgrad_squared", "vargrad")
