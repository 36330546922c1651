"""The shared curvature engine: GGN, Fisher (MC, empirical) and Hessian; diag, K-FAC and dense blocks."""

from bayesso.curvature.blocks import AffineLayout, Block, DenseBlock, DiagBlock, KronBlock
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.engine import KINDS, STRUCTURES, CurvatureEngine
from bayesso.curvature.modules import ModuleRule, register_rule, rule_for

__all__ = [
    "KINDS",
    "STRUCTURES",
    "AffineLayout",
    "Block",
    "Curvature",
    "CurvatureEngine",
    "DenseBlock",
    "DiagBlock",
    "KronBlock",
    "ModuleRule",
    "register_rule",
    "rule_for",
]
