import torch, time, copy, json
import torch.nn.functional as Fn
from simprune.io.imagenet import load_pretrained

D = torch.load("/work/exp/inet.pt", weights_only=True)
XC, _ = D["calibration"]          # labels of the calibration split never read
XE, YE = D["evaluation"]
RAW = D["calibration_raw"]
FIT, HOLD = slice(0, 400), slice(400, 500)

def batches(x, bs=50):
    return [(x[i:i+bs],) for i in range(0, len(x), bs)]

@torch.no_grad()
def logits(m, x, bs=100):
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.cat([m(x[i:i+bs]).float() for i in range(0, len(x), bs)])

TEACHER = load_pretrained().eval()
T_HOLD = logits(TEACHER, XC[HOLD]); T_EVAL = logits(TEACHER, XE)

def measure(m, tag=""):
    lh, le = logits(m, XC[HOLD]), logits(m, XE)
    r = {"hold_agree": float((lh.argmax(1) == T_HOLD.argmax(1)).float().mean() * 100),
         "hold_kl": float(Fn.kl_div(lh.log_softmax(1), T_HOLD.log_softmax(1), log_target=True, reduction="batchmean")),
         "eval_top1": float((le.argmax(1) == YE).float().mean() * 100),
         "eval_agree": float((le.argmax(1) == T_EVAL.argmax(1)).float().mean() * 100)}
    print(tag, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
    return r
