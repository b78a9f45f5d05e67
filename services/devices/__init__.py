"""Devices as measured: real devices fitted to their published times, against the host tierlab runs on.

``published`` reads ncnn's benchmark tables (the data is in ``data/``); ``reference`` times the same networks
here with the same engine and splits them into kernel classes; ``fit`` fits each device's per-class ratios and
checks them leave-one-network-out; ``profiles`` are the devices tierlab ships; ``kit`` calibrates a device you
own. The tiers pace by the fitted ``services.contracts.device.DeviceModelSpec``.
"""
