// A minimal typed event emitter: Node's EventEmitter is not in browsers, and the bundle
// takes no runtime dependency.

export class Emitter<E extends { [K in keyof E]: unknown }> {
  private listeners: { [K in keyof E]?: Set<(value: E[K]) => void> } = {};

  /** Calls `fn` on each `name` event; returns a function that removes it. */
  on<K extends keyof E>(name: K, fn: (value: E[K]) => void): () => void {
    const set = (this.listeners[name] ??= new Set());
    set.add(fn);
    return () => set.delete(fn);
  }

  emit<K extends keyof E>(name: K, value: E[K]): void {
    for (const fn of this.listeners[name] ?? []) {
      // One listener's exception must not stop the others, nor the client's state machine.
      try {
        fn(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}
