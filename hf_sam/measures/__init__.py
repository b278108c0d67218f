"""What is measured after training, on any model: the worst loss in the rho-ball, Hessian eigenvalues
and trace (:mod:`.sharpness`), and loss landscapes (:mod:`.landscape`)."""
