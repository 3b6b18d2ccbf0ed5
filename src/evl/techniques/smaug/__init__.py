"""SMAUG (Lin et al., ICCV 2023): the `mae` loss term with its decoder (`mae`, `mae_decoder`) and the `sparsify`
token operation (`sparsify`, `sparsify_term`). See README.md beside this file."""
