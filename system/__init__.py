"""Where and how the code runs, beneath everything else: the errors a user sees as one line
(errors), files written whole and run folders locked (files), device, precision and speed
(hardware), several processes under torchrun (distributed)."""
