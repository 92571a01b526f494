"""The lecture's teaching code: the information theory under the ELBO (:mod:`.theory`), a VAE that can
be solved exactly, probabilistic PCA (:mod:`.ppca`), and the lecture's figures (:mod:`.figures`).

The library (``pyrovae``) does not depend on it; its tests use ``ppca`` as an oracle.
"""
