// Errors: the system layer speaks negative errno; parts add context at their boundary by
// throwing layerd::Error, which carries the errno and a human-readable chain of context.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <system_error>

namespace layerd {

class Error : public std::system_error {
 public:
  // `err` may be given positive or negative; it is stored as a positive errno value.
  Error(int err, const std::string& what)
      : std::system_error(err < 0 ? -err : err, std::generic_category(), what), context_(what) {}
  // An error that is not an errno (bad input, a protocol violation): EINVAL by default.
  explicit Error(const std::string& what) : Error(EINVAL, what) {}

  [[nodiscard]] int errno_value() const noexcept { return code().value(); }
  // The message without the errno's text, for wrapping in more context without repeating it.
  [[nodiscard]] const std::string& context() const noexcept { return context_; }

 private:
  std::string context_;
};

// Throws Error(-res, context) when `res` is a negative errno result; returns it otherwise.
inline long check(long res, std::string_view context) {
  if (res < 0) throw Error(static_cast<int>(-res), std::string(context));
  return res;
}

// Returns -errno for the calling thread's current errno: for wrapping libc calls.
inline int neg_errno() noexcept { return -errno; }

// Message for a negative (or positive) errno.
std::string errno_message(int err);

}  // namespace layerd
