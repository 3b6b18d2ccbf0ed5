"""EgoVLPv2 (Pramanick et al., ICCV 2023): fusion in the backbone (`fusion`, `fusion.kind: backbone`) and the
`egonce` loss term. See README.md beside this file."""
