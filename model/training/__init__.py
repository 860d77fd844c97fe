"""Training GLIP: `train_targets` (examples -> network inputs and loss targets), `augment` (with
box/text consistency), `loss` (`GLIPLoss`, the official objective) built from `loss_terms`."""
