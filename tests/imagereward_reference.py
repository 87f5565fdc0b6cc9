"""An independent transcript of ImageReward's forward (image-reward 1.5: ``ImageReward.py``,
``models/BLIP/vit.py``, ``models/BLIP/med.py``), in eval mode, with the original parameter names.

The package itself does not import here (it pins timm 0.6.13 and imports helpers removed in
transformers 5), so the tests build this copy with random weights, save its state dict as an
``ImageReward.pt`` would be, and check that ``tdpo.rewards.imagereward_hf`` converts and scores it
identically. Only the code paths ImageReward's ``score`` uses are transcribed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):  # vit.py: Attention (qkv_bias=True in VisionTransformer)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):  # vit.py: Mlp
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):  # vit.py: Block, norm_layer = LayerNorm(eps=1e-6)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):  # timm PatchEmbed
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):  # vit.py: VisionTransformer.forward
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(
            torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dim) * 0.02
        )
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed[:, : x.size(1), :]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertSelfAttention(nn.Module):  # med.py: BertSelfAttention (absolute positions)
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.heads, self.size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key, self.value = nn.Linear(kv_width, hidden), nn.Linear(kv_width, hidden)

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, self.size).permute(0, 2, 1, 3)

    def forward(self, hidden_states, mask, encoder_hidden_states=None):
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = (
            self.split(self.query(hidden_states)),
            self.split(self.key(source)),
            self.split(self.value(source)),
        )
        scores = q @ k.transpose(-1, -2) / self.size**0.5 + mask
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3)
        return context.reshape(*context.shape[:2], -1)


class BertSelfOutput(nn.Module):  # med.py: BertSelfOutput / BertOutput
    def __init__(self, in_width, hidden):
        super().__init__()
        self.dense = nn.Linear(in_width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, kv_width)
        self.output = BertSelfOutput(hidden, hidden)

    def forward(self, x, mask, encoder_hidden_states=None):
        return self.output(self.self(x, mask, encoder_hidden_states), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):  # med.py: BertLayer with mode='multimodal'
    def __init__(self, hidden, heads, inner, encoder_width):
        super().__init__()
        self.attention = BertAttention(hidden, heads, hidden)
        self.crossattention = BertAttention(hidden, heads, encoder_width)
        self.intermediate = BertIntermediate(hidden, inner)
        self.output = BertSelfOutput(inner, hidden)

    def forward(self, x, mask, encoder_hidden_states, encoder_mask):
        x = self.attention(x, mask)
        x = self.crossattention(x, encoder_mask, encoder_hidden_states)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):  # med.py: word + absolute position embeddings, LayerNorm
    def __init__(self, vocab, hidden, max_positions):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)))

    def forward(self, input_ids):
        positions = self.position_ids[:, : input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertEncoder(nn.Module):
    def __init__(self, layers, **kwargs):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(**kwargs) for _ in range(layers)])


class BertModel(nn.Module):  # med.py: BertModel(add_pooling_layer=False), encoder mode
    def __init__(self, vocab, hidden, heads, inner, layers, max_positions, encoder_width):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_positions)
        self.encoder = BertEncoder(
            layers, hidden=hidden, heads=heads, inner=inner, encoder_width=encoder_width
        )

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask):
        mask = (
            1.0 - attention_mask[:, None, None, :].float()
        ) * -10000.0  # get_extended_attention_mask
        encoder_mask = (1.0 - encoder_attention_mask[:, None, None, :].float()) * -10000.0
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, encoder_hidden_states, encoder_mask)
        return x


class BLIP(nn.Module):
    def __init__(
        self,
        image_size,
        patch,
        vision_width,
        vision_depth,
        vision_heads,
        vocab,
        hidden,
        text_heads,
        text_layers,
        max_positions,
    ):
        super().__init__()
        self.visual_encoder = VisionTransformer(
            image_size, patch, vision_width, vision_depth, vision_heads
        )
        self.text_encoder = BertModel(
            vocab, hidden, text_heads, hidden * 4, text_layers, max_positions, vision_width
        )
        # BLIP_Pretrain's projections are in the checkpoint but unused by ImageReward.score.
        self.vision_proj, self.text_proj = nn.Linear(vision_width, 16), nn.Linear(hidden, 16)


class ImageReward(nn.Module):  # ImageReward.py: ImageReward.score_gard (the batched score)
    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, **blip):
        super().__init__()
        self.blip = BLIP(**blip)
        hidden = blip["hidden"]
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(hidden, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, pixels, input_ids, attention_mask):
        image_embeds = self.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        text = self.blip.text_encoder(input_ids, attention_mask, image_embeds, image_atts)
        return ((self.mlp.layers(text[:, 0, :]) - self.mean) / self.std).squeeze(-1)
