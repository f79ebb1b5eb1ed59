"""sd-webui-controlnet ``scripts/ipadapter/plugable_ipadapter.py``: ``PlugableIPAdapter.hook`` replaces the
``forward`` of every cross-attention of the model it is given (input, output, then middle blocks) with plain SDPA
plus each hack's image-prompt attention, and keeps the hooked model and the replaced forwards in module globals
(``current_model``, ``all_hacks``) that ``clear_all_ip_adapter`` restores. The hack reads
``current_model.cond_mark`` (cond rows get the image embedding, uncond rows the empty one) and
``current_model.current_sampling_percent`` (the window), both set by the extension's ``UnetHook``; its keys and
values are cached per layer for the first batch layout seen."""

import sys

import torch

IPAdapterModel = sys.modules["scripts.ipadapter.ipadapter_model"].IPAdapterModel

all_hacks = {}
current_model = None


def attn_forward_hacked(self, x, context=None, **kwargs):
    b, _n, inner = x.shape
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, inner)
    for f in self.ipadapter_hacks:
        out = out + f(self, x, q)
    return self.to_out(out)


def cross_attentions(model):
    out = []
    for part in (model.input_blocks, model.output_blocks, model.middle_block):
        out += [m for name, m in part.named_modules() if name.endswith("attn2")]
    return out


def clear_all_ip_adapter():
    global all_hacks, current_model
    for k, v in all_hacks.items():
        k.forward = v
        k.ipadapter_hacks = []
    all_hacks = {}
    current_model = None


class PlugableIPAdapter(torch.nn.Module):
    def __init__(self, ipadapter: IPAdapterModel):
        super().__init__()
        self.ipadapter = ipadapter
        self.cache = {}

    @torch.no_grad()
    def hook(self, model, preprocessor_outputs, weight, start, end, dtype=torch.float32, **kwargs):
        global current_model
        current_model = model
        self.p_start, self.p_end, self.weight, self.cache = start, end, weight, {}
        self.ipadapter.to("cpu", dtype=dtype)
        self.image_emb = self.ipadapter.get_image_emb(preprocessor_outputs)
        for i, attn in enumerate(cross_attentions(model)):
            if not getattr(attn, "ipadapter_hacks", None):
                attn.ipadapter_hacks = []
                all_hacks[attn] = attn.forward
                attn.forward = attn_forward_hacked.__get__(attn, type(attn))
            attn.ipadapter_hacks.append(self.patch_forward(i))

    def call_ip(self, key, feat, device):
        if key not in self.cache:
            self.cache[key] = self.ipadapter.ip_layers.to_kvs[key](feat).to(device)
        return self.cache[key]

    def patch_forward(self, number):
        @torch.no_grad()
        def forward(attn, x, q):
            b, _n, inner = x.shape
            h = attn.heads
            percent = getattr(current_model, "current_sampling_percent", 0.5)
            if percent < self.p_start or percent > self.p_end or self.weight == 0.0:
                return 0.0
            emb = self.image_emb.eval(current_model.cond_mark)
            ip_k = self.call_ip(f"{number * 2 + 1}_to_k_ip", emb, q.device)
            ip_v = self.call_ip(f"{number * 2 + 1}_to_v_ip", emb, q.device)
            ip_k, ip_v = (t.view(b, -1, h, inner // h).transpose(1, 2).to(q.dtype) for t in (ip_k, ip_v))
            out = torch.nn.functional.scaled_dot_product_attention(q, ip_k, ip_v)
            return out.transpose(1, 2).reshape(b, -1, inner) * self.weight

        return forward
