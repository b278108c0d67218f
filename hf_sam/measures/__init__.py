"""What is measured after training, on any model: the worst loss in the rho-ball, Hessian eigenvalues
and trace (:mod:`.sharpness`), and loss landscapes (:mod:`.landscape`); and what a low-precision kernel sees
of a perturbation (:mod:`.fidelity`), which the trainer also logs during training."""
