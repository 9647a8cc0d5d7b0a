"""The Hub: conversion between nanochat's checkpoints, ours and transformers' built-in class; push and the model card."""
