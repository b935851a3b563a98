"""Independent reference embeddings for ``capture.py --check`` (Hugging Face transformers).

Run in any environment with ``torch``, ``transformers`` and the model package:

    python data/minilm/reference_transformers.py out.npy

Mean pooling + L2 normalization over ``BertModel``'s last hidden state, as
sentence-transformers does for all-MiniLM-L6-v2.
"""

import sys

import numpy as np


def main(out):
    import torch
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from capture import SENTENCES, model_dir

    mdir = str(model_dir())
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModel.from_pretrained(mdir).eval()
    embs = []
    with torch.no_grad():
        for s in SENTENCES:
            enc = tok(s, return_tensors="pt")
            h = model(**enc).last_hidden_state[0].numpy().astype(np.float64)
            e = h.mean(axis=0)
            embs.append(e / np.linalg.norm(e))
    np.save(out, np.stack(embs))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1])
