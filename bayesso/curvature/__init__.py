"""The shared curvature engine: GGN, Fisher (MC, empirical) and Hessian; diag, K-FAC and dense blocks."""

from bayesso.curvature.blocks import AffineLayout, Block, DenseBlock, DiagBlock, KronBlock
from bayesso.curvature.capture import CurvatureCapture
from bayesso.curvature.curvature import Curvature
from bayesso.curvature.engine import KINDS, STRUCTURES, CurvatureEngine
from bayesso.curvature.modules import ModuleRule, register_rule, rule_for
from bayesso.curvature.plan import ModulePlan, plan_modules, trainable_parameters, zero_curvature

__all__ = [
    "KINDS",
    "STRUCTURES",
    "AffineLayout",
    "Block",
    "Curvature",
    "CurvatureCapture",
    "CurvatureEngine",
    "DenseBlock",
    "DiagBlock",
    "KronBlock",
    "ModulePlan",
    "ModuleRule",
    "plan_modules",
    "register_rule",
    "rule_for",
    "trainable_parameters",
    "zero_curvature",
]
