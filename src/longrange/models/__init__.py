"""longrange models: any registered attention inside BERT-style blocks.

    import longrange as lr
    cfg = lr.models.ModelConfig(vocab_size=30522, attention="longformer", attention_options={"window": 512})
    enc = lr.models.Encoder(cfg)              # + heads: classification, token_classification, masked_lm, QA
    lm = lr.models.CausalLM(cfg.replace(attention="local", attention_options={"window": 256}))
    s2s = lr.models.EncoderDecoder(cfg)       # LED style: long encoder, full decoder + cross attention
    enc.save_pretrained("out"); lr.models.Encoder.from_pretrained("out")
"""

from longrange.models.causal_lm import CausalLM
from longrange.models.config import ModelConfig, causal_attentions
from longrange.models.encoder import Encoder
from longrange.models.encoder_decoder import EncoderDecoder
from longrange.models.etc import ETCEncoder, ETCOutput
from longrange.models.memory import MemoryState, stream_perplexity
from longrange.models.outputs import ModelOutput
from longrange.models.structure import ETCStructure, etc_structure

__all__ = ["CausalLM", "Encoder", "EncoderDecoder", "MemoryState", "ModelConfig", "ModelOutput", "causal_attentions",
           "stream_perplexity"]
__all__ += ["ETCEncoder", "ETCOutput", "ETCStructure", "etc_structure"]
