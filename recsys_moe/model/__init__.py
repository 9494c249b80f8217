"""The ranking model: embeddings -> experts -> gates -> towers (see ``ranker.py``).

Shape notation used in comments throughout:
  B batch, F sparse (categorical) features, D embedding dim, N numeric features,
  E experts, H expert output width, T tasks, K domains, G gates.
"""
