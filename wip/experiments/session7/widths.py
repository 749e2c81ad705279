import sys, torch, simprune
from simprune.io.imagenet import load_pretrained
m = simprune.load(sys.argv[1]); t = dict(load_pretrained().named_modules())
print(" ".join(f"{n.replace('features.','f').replace('.conv','')}:{t[n].out_channels}->{mod.out_channels}"
      for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d) and mod.groups == 1 and t[n].out_channels != mod.out_channels))
