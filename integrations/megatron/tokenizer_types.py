"""The names of Megatron-LM's ``--tokenizer-type`` choices, apart from the code that builds them, so that
parsing a command line does not import Megatron-Core."""

TOKENIZER_TYPES = ("NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer",
                   "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer")
"""Megatron-LM's ``--tokenizer-type`` choices zeromega builds (core_v0.16.1 names), each from local files."""
NOT_BUILT = {
    "BertWordPieceLowerCase": "Megatron-LM 0.16.1 sizes the model with its legacy BERT tokenizer ([BOS], [EOS] "
                              "added) and tokenizes data with Megatron-Core's, through transformers: no one "
                              "vocabulary to match",
    "BertWordPieceCase": "Megatron-LM 0.16.1 sizes the model with its legacy BERT tokenizer ([BOS], [EOS] added) "
                         "and tokenizes data with Megatron-Core's, through transformers (100 <extra_id_i> added): "
                         "no one vocabulary to match",
    "MultimodalTokenizer": "multimodal prompt formats need transformers' AutoTokenizer and an image model",
    "NullMultimodalTokenizer": "multimodal runs are not built",
    "SFTTokenizer": "supervised fine-tuning prompt formats are not built",
}
"""The other core_v0.16.1 ``--tokenizer-type`` choices, refused with the reason."""
