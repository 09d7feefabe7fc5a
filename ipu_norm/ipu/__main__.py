"""``python -m ipu_norm.ipu --model efficientnet_b0 --ipus 2 --image-size 160``: balanced pipeline splits."""

from ipu_norm.ipu.splitter import main

main()
