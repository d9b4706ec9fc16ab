from .joint_stepping import step_jointly

__all__ = ["step_jointly"]
