# Diagnostic: train resnet20_selfatt from exactly resnet20's seed-42 initial backbone (gamma = 0 -> same function).
import sys, torch, timm
from timm_gradattn.settings import resolve_train_settings as parse_args
from timm_gradattn import engine
orig = timm.create_model
def create(name, **kw):
    if name != 'resnet20_selfatt':
        return orig(name, **kw)
    state = torch.get_rng_state()
    base = orig('resnet20', **kw)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    model = orig(name, **kw)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all('attn' in k for k in missing), (missing, unexpected)
    torch.set_rng_state(after)
    return model
engine.timm.create_model = create
args = parse_args(['--model', 'resnet20_selfatt', '--output', '/tmp/i12', '--experiment', sys.argv[1]] + sys.argv[2:])
engine.train(args)
