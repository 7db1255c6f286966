"""MuJoCo CPU backend: ``mujoco.batch.Batch`` stepping N simulations on a C thread pool.

State rows live in the Batch; ``bind`` gives live numpy views which ``torch.from_numpy`` wraps without
copying, so tasks read the current state with no per-step transfer. The Batch is documented bit-identical to
looping one ``MjData`` per simulation with ``mj_step`` (tests/test_envs.py checks it for our tasks).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import mujoco
import mujoco.batch  # not loaded by `import mujoco`
import numpy as np
import torch

from distillery.envs.core import Marker, PhysicsBackend, SimState


def default_nthread(num_envs: int) -> int:
    """Threads for the Batch: never more than envs, never more than the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, num_envs))


class MujocoBackend(PhysicsBackend):
    """``num_envs`` copies of the MJCF model at ``xml_path`` in one ``mujoco.batch.Batch``.

    Args:
        xml_path: the task's MJCF file.
        num_envs: number of simulations.
        nthread: Batch threads; None picks :func:`default_nthread`.
        timestep: overrides the model's ``opt.timestep`` if given.
    """

    def __init__(self, xml_path: Path, num_envs: int, nthread: int | None = None,
                 timestep: float | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.model = mujoco.MjModel.from_xml_path(str(xml_path))
        if timestep is not None:
            if not timestep > 0:
                raise ValueError(f"timestep must be > 0 seconds, got {timestep}")
            self.model.opt.timestep = float(timestep)
        self.num_envs = int(num_envs)
        self.nthread = default_nthread(num_envs) if nthread is None else int(nthread)
        self.timestep = float(self.model.opt.timestep)
        self.batch = mujoco.batch.Batch(self.model, self.num_envs, self.nthread)
        self._qpos_np = self.batch.bind("qpos")
        self._qvel_np = self.batch.bind("qvel")
        self._ctrl_np = self.batch.bind("ctrl")
        # sensordata is an output field: a read-only array the Batch refreshes after every call. torch warns
        # about wrapping non-writable arrays; tasks only read it.
        sensordata_np = self.batch.bind("sensordata")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sensordata = torch.from_numpy(sensordata_np)
        self.state = SimState(qpos=torch.from_numpy(self._qpos_np), qvel=torch.from_numpy(self._qvel_np),
                              ctrl=torch.from_numpy(self._ctrl_np), sensordata=sensordata)
        self.qpos0 = torch.from_numpy(self.model.qpos0.copy())
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._render_data: mujoco.MjData | None = None

    def step(self, nstep: int) -> None:
        self.batch.step(nstep=nstep)

    def reset(self, ids: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor, ctrl: torch.Tensor) -> None:
        ids_np = ids.cpu().numpy()
        # Default data (time, warm-start, act...) for these rows; skip mj_forward since we overwrite the state
        # and nothing reads derived fields before the next mj_step recomputes them.
        self.batch.reset(ids_np, stage=mujoco.mjtStage.mjSTAGE_NONE)
        self._qpos_np[ids_np] = qpos.cpu().numpy()
        self._qvel_np[ids_np] = qvel.cpu().numpy()
        self._ctrl_np[ids_np] = ctrl.cpu().numpy()

    def render(self, env_ids: list[int], width: int, height: int, markers: list[list[Marker]],
               camera: str | int | None) -> np.ndarray:
        key = (width, height)
        if key not in self._renderers:
            # The offscreen buffer must fit the frame; grow it on a copy-free model attribute.
            self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, width)
            self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, height)
            self._renderers[key] = mujoco.Renderer(self.model, height=height, width=width)
        renderer = self._renderers[key]
        if camera is None:
            camera = "top" if mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "top") >= 0 else -1
        frames = np.empty((len(env_ids), height, width, 3), dtype=np.uint8)
        for k, i in enumerate(env_ids):  # rendering is per-frame work anyway; not a hot path
            self._render_data = self.batch.get_data(i, self._render_data)
            mujoco.mj_forward(self.model, self._render_data)
            renderer.update_scene(self._render_data, camera=camera)
            for m in markers[k]:
                _add_marker(renderer.scene, m)
            frames[k] = renderer.render()
        return frames

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()


def _add_marker(scene: mujoco.MjvScene, marker: Marker) -> None:
    if scene.ngeom >= scene.maxgeom:
        return
    geom_type = {"box": mujoco.mjtGeom.mjGEOM_BOX, "sphere": mujoco.mjtGeom.mjGEOM_SPHERE}[marker.kind]
    c, s = math.cos(marker.yaw), math.sin(marker.yaw)
    mat = np.array([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    mujoco.mjv_initGeom(scene.geoms[scene.ngeom], geom_type, np.asarray(marker.size, dtype=np.float64),
                        np.asarray(marker.pos, dtype=np.float64), mat, np.asarray(marker.rgba, dtype=np.float32))
    scene.ngeom += 1
