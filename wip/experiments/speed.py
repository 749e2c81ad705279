import torch, time, copy
from simprune.io.imagenet import load_pretrained
t = load_pretrained().eval()
s = copy.deepcopy(t)
x = torch.randn(32, 3, 224, 224)
opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9)
for cl in (False, True):
  for bf in (False, True):
    tt, ss = t, s
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    if cl: tt = t.to(memory_format=torch.channels_last); ss = s.to(memory_format=torch.channels_last)
    for i in range(3):
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf):
            with torch.no_grad(): yt = tt(xx)
            ys = ss(xx)
            loss = torch.nn.functional.mse_loss(ys.float(), yt.float())
        opt.zero_grad(); loss.backward(); opt.step()
        dt = time.time() - t0
    print("channels_last", cl, "bf16", bf, f"{dt:.2f}s/step of 32")
