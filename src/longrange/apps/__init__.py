"""longrange applications: long-document pretraining (masked LM, ETC's CPC), fine-tuning for
classification, extractive QA, token tagging and summarization, built-in long-range tasks
(synthetic), and the evidence run that compares attentions against input length.

    import longrange as lr
    tok = lr.apps.make_tokenizer("byte")                      # or "dna:k=3", or a local HF tokenizer folder
    lr.apps.pretrain(lr.apps.PretrainConfig(data=["corpus.txt"], attention="bigbird", max_length=4096, out="pt"))
    lr.apps.finetune(lr.apps.FinetuneConfig(task="qa", data="long-qa", init="pt/model", out="qa"))
    data = lr.apps.builtin_task("dna-motif", length=2048, size="small")

Command line: `longrange pretrain`, `longrange finetune`, `longrange apps evidence`.
"""

from longrange.apps.cpc import CPCHead, cpc_loss
from longrange.apps.finetune import FinetuneConfig, evaluate_task, finetune, load_finetuned
from longrange.apps.masking import MaskingConfig, mask_tokens
from longrange.apps.metrics import rouge_l, rouge_l_text
from longrange.apps.pretrain import PretrainConfig, pretrain
from longrange.apps.seq2seq import ETCEncoderDecoder
from longrange.apps.tasks import TaskData, builtin_task
from longrange.apps.tokenizers import ByteTokenizer, DNATokenizer, WordTokenizer, load_tokenizer, make_tokenizer

__all__ = ["ByteTokenizer", "CPCHead", "DNATokenizer", "ETCEncoderDecoder", "FinetuneConfig", "MaskingConfig",
           "PretrainConfig", "TaskData", "WordTokenizer", "builtin_task", "cpc_loss", "evaluate_task", "finetune",
           "load_finetuned", "load_tokenizer", "make_tokenizer", "mask_tokens", "pretrain", "rouge_l", "rouge_l_text"]
