"""Python wrappers, fake (meta) kernels and autograd for every torch.ops.lora_ops op, one module per
op family. Importing this package registers them."""

from lora_ops.ops import nf4  # noqa: F401
from lora_ops.ops import adamw  # noqa: F401
from lora_ops.ops import qlora  # noqa: F401
from lora_ops.ops import dora  # noqa: F401
from lora_ops.ops import multi_lora  # noqa: F401
